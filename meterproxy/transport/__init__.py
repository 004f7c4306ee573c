"""The upstream HTTP/1.1 client (see upstream.py, pool.py, connection.py)."""
