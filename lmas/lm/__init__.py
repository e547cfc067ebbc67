"""The frozen language model's side of lmas: prompt encoding, answer log-likelihoods, devices, the shared trunk."""
