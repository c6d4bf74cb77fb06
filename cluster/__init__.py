"""cluster: the Ray glue of resnet-dist (Data pipeline, Train loop, Tune sweep, Serve)."""
