"""``python -m torchq.kernels``: this CPU's features and the path every kernel takes."""

from torchq.kernels.cpu_info import cpu_report

print(cpu_report())
