"""The layer walker: one layer real at a time, the processor steps in order, masks of every layer type."""
from __future__ import annotations

import pytest
import torch

from eora_gguf import walker
from eora_gguf.calibration import collect_stats, stream
from eora_gguf.errors import EoraError
from eora_gguf.walker import LayerContext, Processor, StreamedModel, capture, walk

from tiny_models import SEQLEN, STREAM_DIMS, full_forward, make_stream_model


def test_only_one_layer_is_real_at_a_time(models, ids, monkeypatch):
    real_counts = []
    orig = StreamedModel.load_layer

    def spy(self, i):
        layer = orig(self, i)
        real_counts.append(sum(p.device.type != "meta" for lay in self.layers for p in lay.parameters()))
        return layer

    monkeypatch.setattr(StreamedModel, "load_layer", spy)
    collect_stats(models["gemma3"], ids)
    per_layer = real_counts[0]
    assert per_layer > 0 and real_counts == [per_layer] * STREAM_DIMS["num_hidden_layers"]


def test_gemma3_masks_matter_in_this_setup(tmp_path, models, ids):
    """The gemma3 check above can fail: the same weights with a window covering the whole sequence (so all
    layers attend globally) give clearly different hidden states."""
    wide = make_stream_model("gemma3", sliding_window=SEQLEN * 2)
    wide.save_pretrained(tmp_path / "wide")
    h_wide = stream(tmp_path / "wide", ids)[1]
    h_ref = stream(models["gemma3"], ids)[1]
    assert (h_wide - h_ref).abs().max() > 1e-2 * h_ref.abs().max()


def test_processor_steps_run_in_order_and_hand_results_on(models, ids):
    """hook -> every batch through the hooks (first_batch_done after the first) -> unhook -> process, per layer and
    processor in the order given; what one processor leaves in ctx.results the next one reads; finalize once."""
    sm = StreamedModel(models["llama"])
    hidden, calls = capture(sm, ids.split(2))  # 5 samples: 3 batches
    events = []

    class Recorder(Processor):
        def hook(self, ctx: LayerContext) -> None:
            events.append(("hook", ctx.index))
            mod = ctx.linears[f"{ctx.name}.self_attn.q_proj"][0]
            self.handle = mod.register_forward_hook(lambda *a: events.append(("batch", ctx.index)))

        def first_batch_done(self, ctx: LayerContext) -> None:
            events.append(("first", ctx.index))

        def unhook(self, ctx: LayerContext) -> None:
            self.handle.remove()
            events.append(("unhook", ctx.index))

        def process(self, ctx: LayerContext) -> None:
            events.append(("process", ctx.index))
            ctx.results["seen"] = ctx.index

        def finalize(self) -> None:
            events.append(("finalize",))

    class Reader(Processor):
        def process(self, ctx: LayerContext) -> None:
            events.append(("next", ctx.results["seen"]))

    out = walk(sm, hidden, calls, [Recorder(), Reader()])
    layer = [("hook", 0), ("batch", 0), ("first", 0), ("batch", 0), ("batch", 0), ("unhook", 0), ("process", 0),
             ("next", 0)]
    expected = [(e[0], i) for i in range(STREAM_DIMS["num_hidden_layers"]) for e in layer] + [("finalize",)]
    assert events == expected
    h_full, _ = full_forward(models["llama"], ids)
    torch.testing.assert_close(torch.cat(out), h_full, atol=1e-5, rtol=1e-5)


def test_processor_weights_feed_forward_like_the_callback(models, ids):
    """New weights returned by a processor (the solve's way) propagate exactly as the compensate callback's."""
    d = models["llama"]
    new = {"model.layers.0.mlp.down_proj": torch.randn(48, 80, generator=torch.Generator().manual_seed(5)) * 0.15}

    class Swap(Processor):
        def process(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
            assert ctx.results["stats"].modules(ctx.index)  # the statistics of this layer came first
            return new if ctx.index == 0 else {}

    by_processor, h_p = stream(d, ids, propagate="compensated", processors=[Swap()])
    by_callback, h_c = stream(d, ids, propagate="compensated", compensate=lambda i, s: new if i == 0 else {})
    assert torch.equal(h_p, h_c)
    assert by_processor.covariances.keys() == by_callback.covariances.keys()
    for site, cov in by_callback.covariances.items():
        assert torch.equal(by_processor.covariances[site], cov)
    assert not torch.equal(h_p, stream(d, ids)[1])
    with pytest.raises(EoraError, match="propagate='original'"):
        stream(d, ids, processors=[Swap()])


def test_collect_stats_counts_every_layer(models, ids):
    stats = collect_stats(models["qwen3"], ids)
    assert sorted({int(m.split(".")[2]) for m in stats.modules()}) == list(range(STREAM_DIMS["num_hidden_layers"]))


def test_activation_home_streams_only_what_does_not_fit():
    """Activations stay on the device when they fit in half its free memory, else in (pinned) host memory."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert walker.activation_home(10**12, None) is None and walker.activation_home(10**12, cpu) == cpu
    assert walker.activation_home(4 * 2**30, gpu, free=16 * 2**30) == gpu
    assert walker.activation_home(12 * 2**30, gpu, free=16 * 2**30) == cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: streaming moves batches host -> GPU")
def test_streamed_activations_give_the_same_statistics(models, ids):
    on_gpu = collect_stats(models["llama"], ids, batch_size=2, device="cuda")
    old = walker.FIT_SHARE
    walker.FIT_SHARE = 0.0  # nothing fits: every batch streams from pinned host memory
    try:
        streamed = collect_stats(models["llama"], ids, batch_size=2, device="cuda")
    finally:
        walker.FIT_SHARE = old
    for site, cov in on_gpu.covariances.items():
        torch.testing.assert_close(streamed.covariances[site], cov)
