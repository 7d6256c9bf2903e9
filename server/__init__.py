"""ptserve: the HTTP server, the task and inference services, and the engine."""
