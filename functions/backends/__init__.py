"""Where replicas run: the seam (``base``), worker processes on this machine (``local``), Knative (``knative``)."""
