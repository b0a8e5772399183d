"""Edge inputs across the losses: label dtypes that cannot hold ignore_index, pair-wise scales
outside (0, 1], discriminator inputs it was not built for."""
from __future__ import annotations

import pytest
import torch

import skd_kernels as sk
from skd_kernels.reference import pixelwise_distill_reference


def logits(shape=(2, 4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def labels_with_ignored(ignore_index, dtype, shape=(2, 5, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.4] = ignore_index
    return labels.to(dtype)


# --- labels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype, ignore_index", [(torch.int8, 255), (torch.uint8, -1), (torch.int16, 40000)],
                         ids=["int8-255", "uint8-minus1", "int16-40000"])
def test_ignore_index_outside_the_label_dtype_is_rejected(backend, dtype, ignore_index):
    student, teacher = logits()
    labels = torch.zeros((2, 5, 6), dtype=dtype)
    with pytest.raises(ValueError, match=rf"ignore_index={ignore_index}.*labels of dtype {dtype}"):
        sk.pixelwise_distill_loss(student, teacher, labels, form="kl", ignore_index=ignore_index, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype, ignore_index", [(torch.uint8, 255), (torch.int16, 255), (torch.int8, -1)],
                         ids=["uint8-255", "int16-255", "int8-minus1"])
def test_ignore_index_the_label_dtype_holds_ignores_those_pixels(backend, dtype, ignore_index):
    student, teacher = logits()
    labels = labels_with_ignored(ignore_index, dtype)
    assert (labels == ignore_index).any() and (labels != ignore_index).any()
    loss = sk.pixelwise_distill_loss(student, teacher, labels, form="kl", ignore_index=ignore_index, backend=backend)
    ref = pixelwise_distill_reference(student.double(), teacher.double(), labels.long(), form="kl",
                                      ignore_index=ignore_index)
    everything = pixelwise_distill_reference(student.double(), teacher.double(), form="kl")
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))
    assert abs(float(ref) - float(everything)) > 1e-3  # the mask did change the loss


def test_ignore_index_must_be_an_integer():
    student, teacher = logits()
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        sk.pixelwise_distill_loss(student, teacher, torch.zeros((2, 5, 6), dtype=torch.long), form="kl",
                                  ignore_index=2.5)


# --- discriminator inputs -------------------------------------------------------------------------

def small_discriminator(**kwargs):
    torch.manual_seed(0)
    return sk.Discriminator(1, 19, 2, 65, conv_dim=16, attention="naive", **kwargs)


DISCRIMINATOR_BAD_INPUTS = {  # name: (input, error type, message)
    "channels": (lambda: torch.randn(2, 21, 65, 65), ValueError, r"x must have 19 channels.*\(2, 21, 65, 65\)"),
    "integer dtype": (lambda: torch.zeros(2, 19, 65, 65, dtype=torch.long), TypeError, "x must be float32.*torch.int64"),
    "empty batch": (lambda: torch.randn(0, 19, 65, 65), ValueError, r"x must hold a batch.*\(0, 19, 65, 65\)"),
    "rank": (lambda: torch.randn(19, 65, 65), ValueError, r"x must be 4-d \(B, 19, H, W\)"),
    "not a tensor": (lambda: [[0.0]], TypeError, "x must be a torch.Tensor"),
    "device": (lambda: torch.randn(2, 19, 65, 65, device="meta"), ValueError, "x is on meta but the discriminator is on cpu"),
}


@pytest.mark.parametrize("case", DISCRIMINATOR_BAD_INPUTS)
def test_discriminator_input_errors_name_the_input_before_any_layer_runs(case):
    make, error, message = DISCRIMINATOR_BAD_INPUTS[case]
    d = small_discriminator()
    running_mean = d.preprocess_additional.running_mean.clone()
    with pytest.raises(error, match=message):
        d(make())
    assert torch.equal(d.preprocess_additional.running_mean, running_mean)  # BatchNorm never ran


def test_image_conditioned_discriminator_counts_the_image_channels():
    d = sk.Discriminator(None, 22, 2, 65, conv_dim=16, attention="naive", image_conditioned=True)
    image = torch.rand(2, 3, 130, 130)
    with pytest.raises(ValueError, match=r"x must have 19 channels"):
        d(torch.randn(2, 20, 65, 65), image)
    with pytest.raises(ValueError, match="needs image"):
        d(torch.randn(2, 19, 65, 65), image[:1])
    assert d(torch.randn(2, 19, 65, 65), image)[0].shape == (2, 1, 1, 1)


HOLISTIC_ENTRY_POINTS = {
    "d_loss": lambda loss, s, t: loss.d_loss(s, t),
    "d_step": lambda loss, s, t: loss.d_step(s, t),
    "g_loss": lambda loss, s, t: loss.g_loss(s),
    "additional_gp": lambda loss, s, t: sk.CriterionAdditionalGP(loss.discriminator, 10.0)([s], [t]),
}


@pytest.mark.parametrize("entry", HOLISTIC_ENTRY_POINTS)
@pytest.mark.parametrize("case", ["channels", "integer dtype", "empty batch"])
def test_holistic_losses_name_the_student_maps(entry, case):
    make, error, _ = DISCRIMINATOR_BAD_INPUTS[case]
    loss = sk.HolisticDistillLoss(small_discriminator())
    student = make()
    teacher = torch.zeros_like(student)
    name = "d_in_S" if entry == "additional_gp" else "student"
    with pytest.raises(error, match=rf"^{name} "):
        HOLISTIC_ENTRY_POINTS[entry](loss, student, teacher)


def test_gradient_penalty_rejects_an_empty_batch_and_integer_inputs():
    d = small_discriminator()
    with pytest.raises(ValueError, match="real must hold a batch"):
        sk.gradient_penalty(d, torch.randn(0, 19, 65, 65), torch.randn(0, 19, 65, 65))
    with pytest.raises(TypeError, match="real must be float32"):
        sk.gradient_penalty(d, torch.zeros(1, 19, 65, 65, dtype=torch.long),
                            torch.zeros(1, 19, 65, 65, dtype=torch.long))
