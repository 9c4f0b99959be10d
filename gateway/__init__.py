"""Gateway: the REST and gRPC front door; user events in, recommendations out within a budget."""
