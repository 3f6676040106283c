"""The FedAvg baseline: local backprop training of the (masked) model on a client."""
