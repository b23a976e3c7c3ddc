"""The seed demo's reference job: top eigenvalues of a seeded random matrix.

    sshjobs run -i inventory/lab.toml --install numpy examples/eigen.py:eigen 7
    sshjobs map -i inventory/lab.toml --install numpy examples/eigen.py:eigen --range 10
"""


def eigen(job_id: int) -> dict:
    """A 200x200 standard-normal matrix from numpy's default_rng(seed=job_id); its three
    largest eigenvalues by absolute value, rounded to 2 places."""
    import numpy as np  # imported on the host: sshjobs installs numpy there at run time

    rng = np.random.default_rng(seed=job_id)
    matrix = rng.standard_normal((200, 200))
    magnitudes = np.sort(np.abs(np.linalg.eigvals(matrix)))[::-1]
    return {
        "job_id": job_id,
        "matrix_shape": [int(n) for n in matrix.shape],
        "top_eigenvalues": [round(float(x), 2) for x in magnitudes[:3]],
    }
