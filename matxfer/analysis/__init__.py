"""What transferred: layer-wise mutual information (TransRate), weight drift, and the report."""
