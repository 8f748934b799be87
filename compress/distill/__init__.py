"""Knowledge distillation: losses (pure functions of tensors) now; teacher cache and trainer next."""
