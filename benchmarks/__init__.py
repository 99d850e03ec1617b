"""`appliance bench`: the appliance against a PyTorch fp32 baseline, infinity-emb and the raw
INT8 engine, on the same model and machine, in one run. See benchmarks/results/README.md."""
