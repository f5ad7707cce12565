"""adversarial"""
