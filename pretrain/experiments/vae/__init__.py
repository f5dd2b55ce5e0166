"""BigLearn-VAE: continuous patch tokens and one universal model p(x_T, z | x_S) ("Big Learning
Variational Auto-Encoders"), beside the jointly trained VAE it is compared with.

    config.py     experiment schemas (configs/experiment/vae_digits.yaml)
    patches.py    images -> patch tokens, the digits split, user .npz data
    gaussian.py   diagonal Gaussian log-density, KL, reparameterised draws
    model.py      PatchTransformer (pretrain.model blocks over patch / z rows), BigLearnVAE, JointVAE
    objective.py  (S, T) batches in the sorted layout, BigLearnELBO_U / JointELBO, encoding, in-painting
    train.py      training through one optimiser step; evaluation (test JointELBO, linear probe)
"""
