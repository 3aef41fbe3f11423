"""The run layer: what trains, checkpoints, distributes, quantizes, generates and evaluates the
model of `dla.model`, under the `dla` command. Its modules import one way (docs/architecture.md):
`device`, `data`, `optim`, `synthetic` first; `checkpoint` (every kind of checkpoint is read
there); `distributed` and `quantize`; `train` (the one training step) and `generate`; `experiment`
on top. `eval/` holds held-out and task evaluation."""
