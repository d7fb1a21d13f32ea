"""The math of every method, in pure torch + einops: no comfy import, testable alone."""
