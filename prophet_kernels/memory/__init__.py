"""The memory system: experts in pinned host memory, a paged buffer of expert slots on the device,
the residency decisions, the copy stream, and ``ProphetMoE``, the layer both integrations drive.

    store       HostExpertStore: all experts of all MoE layers in (pinned) host memory, one
                block per expert so one copy moves it
    buffer      SlotTable (owners, pins, eviction policy; no tensors) and PagedExpertBuffer (the
                device slots and page table [L, E] it describes); LRU, LFU, cyclic, next-use, Belady
    residency   ExpertResidency: hits, misses, victims, prefetches within a budget, and the stats;
                the same decisions the trace simulator (``routing``) replays
    predictors  what a layer call may prefetch: the Predictor interface and its runtime
                predictors (same, gate lookahead, learned gate lookahead) and the history ones the
                routing study fits (frequency, transition, learned, oracle)
    prefetch    StreamPrefetcher: one copy stream, ready/read events per slot, NVTX ranges
    layer       ProphetMoE: route, ensure resident, paged GEMMs (``kernels``), prefetch

Invariants: a slot that a launched kernel may still read is never overwritten (pins on the host,
read events on the device); a slot is read only after the copy that filled it; a refused call
changes nothing (counters, owners, pins, page table).
"""
