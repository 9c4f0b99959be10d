"""Small, torch-free code shared by the services and the exporter: bundle, errors, gRPC lifecycle."""
