"""Methods vLLM adds to each of its workers (``worker_extension_cls``), called via collective_rpc.

They run inside vLLM's engine-core process. vLLM imports this module there before it loads the
model, which is what registers the project's `rapo_gloo` weight-transfer engine in that process
(vLLM's factory creates the configured engine right after loading the model).

`load_weights_file` is the `file` transport, kept for comparison: tensors cannot cross
collective_rpc while multiprocessing is on, so weights arrive as a safetensors file on node-local
shared memory that the worker memory-maps.
"""

from __future__ import annotations

from rollout.vllm_weight_transfer import register

register()


class WeightSyncExtension:
    def load_weights_file(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        # reload_weights goes through vLLM's own loaders, which also redo the CPU backend's
        # weight repacking; plain model.load_weights would hit the repacked (empty) params.
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)
