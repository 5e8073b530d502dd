"""A simulated XE9680 node: fake NVML driven by a trace recorded on a real H200."""
