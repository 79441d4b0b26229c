"""Registrations of the measure family beyond CKA (Procrustes, CCA, RSA, k-NN...)."""
