"""Beyond one device: the experts sharded over processes with torch.distributed."""
