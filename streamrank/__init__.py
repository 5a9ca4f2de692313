"""streamrank: real-time personalized re-ranking of search results."""
