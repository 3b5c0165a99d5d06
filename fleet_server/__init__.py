"""The control plane: devices, releases, registry, campaigns and the AWS IoT Jobs protocol."""
