"""The server our tests and `make serve` start logs no database error (core keeps its database
under <host>/user/, which server_command creates)."""


def test_the_server_starts_without_a_database_error(server):
    log = server.log_path.read_text()
    assert "To see the GUI go to" in log or "Starting server" in log
    assert "Failed to initialize database" not in log
