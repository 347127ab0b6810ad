"""How ranks share the work.

- topology: the pp x dp x tp rank grid and its groups' communicators;
- split: which layers each pipeline stage holds;
- collectives: the mpi4py collectives of sharded layers;
- mappings: the autograd pairs that call them;
- layers: the tensor-parallel layers and how their tensors are cut;
- p2p, schedules: point-to-point between pipeline stages, and the 1F1B and GPipe schedules;
- interleaved: the interleaved 1F1B schedule of virtual stages (chunks of layers round a ring of stages);
- agreement: the two ways ranks agree when one of them meets a problem;
- jobwide: the job's own small collectives (agreements, the stop vote, logged means, digests).
"""
