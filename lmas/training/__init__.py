"""Training one experience: the Lightning module and data of a fit, and the fit backends."""
