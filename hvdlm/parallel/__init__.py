"""How ranks share the work: the pp x dp x tp rank grid (topology), the mpi4py collectives of sharded layers
(collectives), the autograd pairs that call them (mappings), the tensor-parallel layers and how their tensors are
cut (layers), and the two ways ranks agree when one of them meets a problem (agreement)."""
