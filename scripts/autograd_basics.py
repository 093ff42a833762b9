"""The tutorial's first example: autograd computes dy/dx of y = x**2 at x = 2, which is 4.

python scripts/autograd_basics.py
"""

import torch


def square_gradient(at: float) -> torch.Tensor:
    """d(x**2)/dx at `at`, computed by autograd."""
    x = torch.tensor([at], requires_grad=True)
    y = x**2
    y.backward()
    return x.grad


if __name__ == "__main__":
    print(square_gradient(2.0))
