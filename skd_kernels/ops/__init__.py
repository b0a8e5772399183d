"""Op registration (torch.library) and autograd, one module per op."""
