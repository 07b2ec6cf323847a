"""memgen.hf"""
