"""Router: the aggregated catalog, namespacing, and dispatch of agent requests to upstreams."""
