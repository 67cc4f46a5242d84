"""MIMO-UNet structure, key names, weights loading and the self-ensemble.

Parity with the authors' network is checked two independent ways: the full list of state_dict
names and shapes is generated here from upstream's module layout (not read back from our
model), and a functional forward written in this file straight from upstream's ``forward``
(F.conv2d over the state_dict by key) must give the same output as our module.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deblur.config import ModelConfig
from deblur.errors import ConfigError, ModelError, WeightsError
from deblur.model import MODELS, create_model
from deblur.model.mimo_unet import SelfEnsemble
from deblur.model.weights import load_model, load_weights, provenance

C = 32


def _conv(name: str, c_in: int, c_out: int, k: int, transpose: bool = False):
    shape = (c_in, c_out, k, k) if transpose else (c_out, c_in, k, k)
    return [(f"{name}.main.0.weight", shape), (f"{name}.main.0.bias", (c_out,))]


def upstream_keys(num_res: int) -> list[tuple[str, tuple[int, ...]]]:
    """state_dict names/shapes of upstream's MIMOUNet(num_res), in registration order."""
    keys: list[tuple[str, tuple[int, ...]]] = []

    def stage(prefix: str, ch: int) -> None:
        for j in range(num_res):
            keys.extend(_conv(f"{prefix}.layers.{j}.main.0", ch, ch, 3))
            keys.extend(_conv(f"{prefix}.layers.{j}.main.1", ch, ch, 3))

    for i, ch in enumerate((C, 2 * C, 4 * C)):
        stage(f"Encoder.{i}", ch)
    for i, (a, b, k, t) in enumerate([(3, C, 3, 0), (C, 2 * C, 3, 0), (2 * C, 4 * C, 3, 0),
                                      (4 * C, 2 * C, 4, 1), (2 * C, C, 4, 1), (C, 3, 3, 0)]):
        keys.extend(_conv(f"feat_extract.{i}", a, b, k, bool(t)))
    for i, ch in enumerate((4 * C, 2 * C, C)):
        stage(f"Decoder.{i}", ch)
    keys.extend(_conv("Convs.0", 4 * C, 2 * C, 1) + _conv("Convs.1", 2 * C, C, 1))
    keys.extend(_conv("ConvsOut.0", 4 * C, 3, 3) + _conv("ConvsOut.1", 2 * C, 3, 3))
    for i, out in enumerate((C, 2 * C)):
        keys.extend(_conv(f"AFFs.{i}.conv.0", 7 * C, out, 1) + _conv(f"AFFs.{i}.conv.1", out,
                                                                       out, 3))
    for fam, scm, ch in (("FAM1", "SCM1", 4 * C), ("FAM2", "SCM2", 2 * C)):
        keys.extend(_conv(f"{fam}.merge", ch, ch, 3))
        keys.extend(_conv(f"{scm}.main.0", 3, ch // 4, 3) + _conv(f"{scm}.main.1", ch // 4,
                                                                   ch // 2, 1))
        keys.extend(_conv(f"{scm}.main.2", ch // 2, ch // 2, 3) + _conv(f"{scm}.main.3",
                                                                       ch // 2, ch - 3, 1))
        keys.extend(_conv(f"{scm}.conv", ch, ch, 1))
    return keys


@pytest.mark.parametrize(("name", "num_res", "count"), [("mimo-unet", 8, 244),
                                                         ("mimo-unet-plus", 20, 532)])
def test_state_dict_names_and_shapes_match_upstream(name: str, num_res: int, count: int) -> None:
    ours = {k: tuple(v.shape) for k, v in create_model(name).state_dict().items()}
    expected = dict(upstream_keys(num_res))
    assert len(expected) == count
    assert ours == expected


def test_parameter_counts_match_the_paper() -> None:
    # Paper Table 1: 6.8 M (MIMO-UNet) and 16.1 M (MIMO-UNet+).
    counts = {n: sum(p.numel() for p in create_model(n).parameters()) for n in
              ("mimo-unet", "mimo-unet-plus")}
    assert counts == {"mimo-unet": 6_807_171, "mimo-unet-plus": 16_107_651}


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, num_res: int
                       ) -> list[torch.Tensor]:
    """Upstream MIMOUNet.forward, written functionally over the state_dict."""

    def conv(name: str, t: torch.Tensor, relu: bool, stride: int = 1,
             transpose: bool = False) -> torch.Tensor:
        w, b = sd[f"{name}.main.0.weight"], sd[f"{name}.main.0.bias"]
        k = w.shape[-1]
        if transpose:
            t = F.conv_transpose2d(t, w, b, stride=stride, padding=k // 2 - 1)
        else:
            t = F.conv2d(t, w, b, stride=stride, padding=k // 2)
        return F.relu(t) if relu else t

    def stage(prefix: str, t: torch.Tensor) -> torch.Tensor:
        for j in range(num_res):
            p = f"{prefix}.layers.{j}.main"
            t = conv(f"{p}.1", conv(f"{p}.0", t, True), False) + t
        return t

    def scm(prefix: str, t: torch.Tensor) -> torch.Tensor:
        m = t
        for i, relu in enumerate((True, True, True, True)):
            m = conv(f"{prefix}.main.{i}", m, relu)
        return conv(f"{prefix}.conv", torch.cat([t, m], 1), False)

    def fam(prefix: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + conv(f"{prefix}.merge", a * b, False)

    def aff(i: int, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        t = torch.cat([a, b, c], 1)
        return conv(f"AFFs.{i}.conv.1", conv(f"AFFs.{i}.conv.0", t, True), False)

    x_2 = F.interpolate(x, scale_factor=0.5)
    x_4 = F.interpolate(x_2, scale_factor=0.5)
    z2, z4 = scm("SCM2", x_2), scm("SCM1", x_4)
    res1 = stage("Encoder.0", conv("feat_extract.0", x, True))
    z = fam("FAM2", conv("feat_extract.1", res1, True, 2), z2)
    res2 = stage("Encoder.1", z)
    z = fam("FAM1", conv("feat_extract.2", res2, True, 2), z4)
    z = stage("Encoder.2", z)
    z12 = F.interpolate(res1, scale_factor=0.5)
    z21 = F.interpolate(res2, scale_factor=2)
    z42 = F.interpolate(z, scale_factor=2)
    z41 = F.interpolate(z42, scale_factor=2)
    res2 = aff(1, z12, res2, z42)
    res1 = aff(0, res1, z21, z41)
    z = stage("Decoder.0", z)
    out = [conv("ConvsOut.0", z, False) + x_4]
    z = conv("feat_extract.3", z, True, 2, transpose=True)
    z = stage("Decoder.1", conv("Convs.0", torch.cat([z, res2], 1), True))
    out.append(conv("ConvsOut.1", z, False) + x_2)
    z = conv("feat_extract.4", z, True, 2, transpose=True)
    z = stage("Decoder.2", conv("Convs.1", torch.cat([z, res1], 1), True))
    out.append(conv("feat_extract.5", z, False) + x)
    return out


@pytest.mark.parametrize(("name", "num_res"), [("mimo-unet", 8), ("mimo-unet-plus", 20)])
def test_forward_matches_upstream_functional_forward(name: str, num_res: int) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():  # non-trivial weights so every branch matters
        for p in model.parameters():
            p.normal_(0, 0.05)
    x = torch.rand(2, 3, 32, 48)
    with torch.inference_mode():
        ours = model(x)
        ref = _reference_forward(model.state_dict(), x, num_res)
    assert [o.shape for o in ours] == [(2, 3, 8, 12), (2, 3, 16, 24), (2, 3, 32, 48)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plus_is_deterministic_in_eval_mode() -> None:
    # MIMO-UNet+ has dropout: eval() must switch it off or outputs vary run to run.
    model = create_model("mimo-unet-plus")
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model(x)[2], model(x)[2])


def test_plusplus_is_the_mean_of_the_eight_transformed_passes() -> None:
    torch.manual_seed(1)
    ensemble = create_model("mimo-unet-plusplus")
    assert isinstance(ensemble, SelfEnsemble)
    net = ensemble.net
    x = torch.rand(1, 3, 16, 24)
    with torch.inference_mode():
        manual = torch.stack([
            SelfEnsemble.inverse(net(SelfEnsemble.transform(x, i))[2], i) for i in range(8)
        ]).mean(0)
        flips = {net(SelfEnsemble.transform(x, i))[2].shape for i in range(8)}
        got = ensemble(x)[2]
    assert flips == {(1, 3, 16, 24), (1, 3, 24, 16)}  # transposes really happened
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, net(x)[2], atol=1e-4)  # and the ensemble is not one pass


def test_plusplus_takes_plus_checkpoints_without_prefix() -> None:
    assert set(create_model("mimo-unet-plusplus").state_dict()) == set(
        create_model("mimo-unet-plus").state_dict())


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="mimo-unet, mimo-unet-plus, mimo-unet-plusplus"):
        create_model("mimo")
    assert set(MODELS) == {"mimo-unet", "mimo-unet-plus", "mimo-unet-plusplus"}


def test_authors_fp16_checkpoint_loads_strictly(tmp_path: Path) -> None:
    source = create_model("mimo-unet")
    sd = {k: v.half() for k, v in source.state_dict().items()}
    path = tmp_path / "MIMO-UNet.pkl"
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 3000}, path)
    model = create_model("mimo-unet")
    digest = load_weights(model, str(path), "mimo-unet")
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, sd[k].float()), k


def test_bare_state_dict_and_file_uri_and_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = create_model("mimo-unet")
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    for uri in (f"file://{tmp_path}/bare.pth", str(tmp_path / "w.safetensors")):
        model = create_model("mimo-unet")
        load_weights(model, uri, "mimo-unet")
        key = "Decoder.2.layers.7.main.1.main.0.weight"
        assert torch.equal(model.state_dict()[key], source.state_dict()[key])


def test_wrong_checkpoint_names_the_keys_and_the_model(tmp_path: Path) -> None:
    torch.save({"model": create_model("mimo-unet-plus").state_dict()}, tmp_path / "plus.pkl")
    with pytest.raises(WeightsError) as err:
        load_weights(create_model("mimo-unet"), str(tmp_path / "plus.pkl"), "mimo-unet")
    message = str(err.value)
    assert "'mimo-unet'" in message and "unexpected keys" in message
    assert "Encoder.0.layers.8.main.0.main.0.weight" in message


def test_dataparallel_prefix_gets_a_hint(tmp_path: Path) -> None:
    sd = {f"module.{k}": v for k, v in create_model("mimo-unet").state_dict().items()}
    torch.save(sd, tmp_path / "dp.pth")
    with pytest.raises(WeightsError, match="missing keys.*module."):
        load_weights(create_model("mimo-unet"), str(tmp_path / "dp.pth"), "mimo-unet")


class _Payload:
    """An object whose unpickling would run code: it must never be constructed."""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))  # type: ignore[attr-defined]


def test_pickled_code_is_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)  # type: ignore[attr-defined]
    path = tmp_path / "evil.pkl"
    torch.save({"model": payload}, path, pickle_module=pickle)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_weights(create_model("mimo-unet"), str(path), "mimo-unet")
    assert not marker.exists()


def test_missing_weights_file_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="nothing.pkl"):
        load_weights(create_model("mimo-unet"), str(tmp_path / "nothing.pkl"), "mimo-unet")


def test_no_weights_refuses_unless_random_weights_is_explicit() -> None:
    with pytest.raises(ConfigError, match="--random-weights"):
        ModelConfig().validate()
    ModelConfig(random_weights=True).validate()
    model = load_model(ModelConfig(random_weights=True))
    assert provenance(ModelConfig(random_weights=True))["weights_sha256"] is None
    assert not model.training
