"""HTTP process: app factory (`create_app`), schemas, routes, `run_server`."""
