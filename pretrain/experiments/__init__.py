"""Research code: experiments built on the library, never imported by it (tests/test_imports.py).

    synthetic     sources with exact conditionals (Markov chain, hidden Markov model) and `fit`
    demo          `make demo`: data, training, evaluation, report and plot in a few minutes
    demo_report   the demo's held-out infilling, left-to-right NLL and examples
    vae           the BigLearn-VAE on continuous patch tokens (bench/vae.py)
"""
