"""ROS 2 bag access: open/convert/write (io), ground truth, player, recorder. Imports nothing from its siblings."""
