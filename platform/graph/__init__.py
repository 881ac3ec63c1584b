"""Graph neural networks (GCN, MPNN, GIN): their training step and `raycraft oversmoothing`."""
