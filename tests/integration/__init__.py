"""Integration tests (tiny models through the engine); a package so basenames may repeat tests/unit."""
