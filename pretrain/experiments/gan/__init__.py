"""BigLearn-GAN: a universal generator G(x_T | x_S, z) against a universal discriminator
f(x; S, T) ("Big Cooperative Learning", eq. 8, App. D) on continuous patch tokens, beside the
joint GAN (S always empty) it is compared with.

    config.py     experiment schemas (configs/gan_digits.yaml)
    model.py      Generator and Discriminator (pretrain.model blocks over patch rows)
    objective.py  (S, T) splits, eq. (8), the R1 penalty, eq. (12) "communication" (App. D.2)
    train.py      alternating training (Algorithm 1); joint sampling and completion; the chimera probe
    metrics.py    the digits classifier, Frechet distance, class coverage, pairwise distance, nearest image on S
"""
