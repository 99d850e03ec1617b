"""Several worker processes on one box (server.workers > 1): the supervisor that runs
them, and the local backends that stay exact across processes (SQLite transactions and file
locks in data_dir) when no [cluster] backends are configured."""
