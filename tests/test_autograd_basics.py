from autograd_basics import square_gradient


def test_square_gradient_at_two_is_four():
    # d(x**2)/dx = 2x, so 4 at x = 2 (the tutorial's first output: tensor([4.])).
    assert square_gradient(2.0).tolist() == [4.0]


def test_square_gradient_matches_derivative_elsewhere():
    assert square_gradient(-1.5).tolist() == [-3.0]
