"""gradserve: loss and gradients for ensembles of small MLPs, served over gRPC."""

__version__ = "0.1.0"
