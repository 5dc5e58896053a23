"""distill-cli's Optuna sweeper for Hydra (Optuna >= 4, ask/tell, persistent storage)."""
