"""Paper stage 4: the noise-aware latent classifier and classifier-guided generation.

- ``latent_classifier_net``: the time-conditioned latent classifier p(y | z_t, t) (factory)
- ``latent_classifier_training``: eq. 6, cross-entropy on z_t with t ~ U(1, T), accuracy per t
- ``classifier_guidance``: eps_hat = eps - g * sqrt(1 - abar_t) * grad log p(y | z_t), seeded guided DDIM
- ``candidates``: how many candidates per class, and generating them to disk
"""
