"""Router analytics, monitoring and plots."""
