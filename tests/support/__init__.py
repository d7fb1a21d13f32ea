"""Test and tooling support shared by the test layers and scripts/: paths, the host, the server client."""
