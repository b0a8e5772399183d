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
