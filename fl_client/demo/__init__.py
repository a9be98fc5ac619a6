"""A real federated training on scikit-learn's digits: a server and five participants on this machine."""
