"""memgen.memory"""
