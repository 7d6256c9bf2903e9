"""ptserve: the HTTP server, scheduler and model runner."""
