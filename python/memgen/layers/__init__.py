"""memgen.layers"""
