"""The API's routers, one module per resource: jobs, models, and the service itself."""
