"""POSIX conformance of real mounts, measured with third-party checkers (built from
``../shared/tools`` by tests/posix_tools.py):

* pjdfstest, run by ``prove`` as root from a directory inside a mount made with
  ``allow_other`` (pjdfstest switches to other users) and ``default_permissions`` (always on),
  on the local store. Every failure must be listed in EXPECTED_FAILURES, by test file and
  subtest number, with its reason; anything else fails the test, naming the files and subtests.
* fsx (-N ops, files up to 4 MiB, plain and with a close/open between operations) on both
  stores: fsx checks every read against its own model of the file; after a cold remount (cache
  emptied) the file must be byte-identical to what the same fsx run (fsx is deterministic by
  seed) leaves in a tmpfs file.
"""
from __future__ import annotations

import filecmp
import os
import stat
import subprocess
import tempfile

import pytest

from posix_tools import Tools, build_tools, parse_prove_summary, parse_ranges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pjdfstest switches users: it needs root")


@pytest.fixture(scope="session")
def tools() -> Tools:
    return build_tools()


# -- pjdfstest ------------------------------------------------------------------------------

_LINK = "hard links are refused with EPERM: objects cannot share content (docs/semantics.md)"
_SPECIAL = ("mknod/mkfifo/bind give EPERM until special files are stored as objects (issue 13, "
            "its special-files branch)")
_KEY_LENGTH = ("a path beyond OSS's 1,023-byte object key limit gives ENAMETOOLONG (pjdfstest makes "
               "paths up to PATH_MAX, 4,095 bytes; docs/semantics.md)")

# What fails on the local store, by pjdfstest file → [(subtests, reason, strict)], measured from a
# run in this layout (the work directory "pjdfstest" at the mount's root: key-length cases depend
# on the path length). Special-file cases include every later step of the same loop pass that
# works on the file mknod/mkfifo/bind could not make (checked by running pjdfstest with those
# types taken out of its loops: nothing else failed). strict: a listed subtest that passes fails
# the test too (the list must shrink with the fixes); special-file cases are not strict, so the
# special-files branch can land first.
EXPECTED_FAILURES: dict[str, list[tuple[str, str, bool]]] = {
    'chmod/00.t': [
        ('22-24, 26-28, 31-34, 36-38, 41-44, 46-48, 51-54, 56-58, 61, 70-85, 94-109', _SPECIAL, False),
    ],
    'chmod/01.t': [('5-16', _SPECIAL, False)],
    'chmod/03.t': [('1-4', _KEY_LENGTH, True)],
    'chmod/11.t': [
        ('18-20, 22-23, 25-28, 30-31, 33-36, 38-39, 41-44, 46-47, 49, 69-71, 73-76, 78-81, 83-86, 88-91, '
         '93-96, 98-101, 103-106, 108',
         _SPECIAL, False),
    ],
    'chown/00.t': [
        ('34-38, 40-42, 45-54, 56-58, 61-70, 72-74, 77-86, 88-90, 93-97, 162-168, 170-172, 174-176, '
         '178-180, 183-198, 200-202, 204-206, 208-210, 213-228, 230-232, 234-236, 238-240, 243-258, '
         '260-262, 264-266, 268-270, 273-281, 316-318, 320-321, 324-331, 333-334, 337-344, 346-347, '
         '350-357, 359-360, 363-367, 446-455, 457-469, 471-492, 494-506, 508-529, 531-543, 545-566, '
         '568-580, 582-593, 696-709, 711-729, 731-760, 762-780, 782-811, 813-831, 833-862, 864-882, '
         '884-899, 948-954, 956-961, 963-978, 980-985, 987-1002, 1004-1009, 1011-1026, 1028-1033, '
         '1035-1043, 1082-1083, 1085, 1087, 1089, 1091-1093, 1095-1098, 1100, 1102, 1104, 1106-1108, '
         '1110-1113, 1115, 1117, 1119, 1121-1123, 1125-1128, 1130, 1132, 1134, 1136-1138, 1140-1141, '
         '1189-1194, 1196-1200, 1202-1215, 1217-1221, 1223-1236, 1238-1242, 1244-1257, 1259-1263, '
         '1265-1272',
         _SPECIAL, False),
    ],
    'chown/01.t': [('6-21', _SPECIAL, False)],
    'chown/03.t': [('1-4, 6-9', _KEY_LENGTH, True)],
    'chown/07.t': [('44-49, 51-54, 56-69, 71-74, 76-89, 91-94, 96-109, 111-114, 116-123', _SPECIAL, False)],
    'ftruncate/03.t': [('1-4', _KEY_LENGTH, True)],
    'link/00.t': [('4-15, 18-20, 22, 24, 30-41, 44-46, 48, 50, 56-67, 70-72, 74, 76, 82-93, 96-98, 100, 102, 108-119, 122-124, 126, 128, 133-136, 138, 140-143, 145, 147-150, 152, 154-157, 159, 161-164, 166', _LINK, True)],
    'link/02.t': [('2, 4-6', _LINK, True)],
    'link/03.t': [('1-12', _LINK, True)],
    'link/06.t': [('7-8', _LINK, True)],
    'link/07.t': [('7-8', _LINK, True)],
    'link/09.t': [('2, 4', _LINK, True)],
    'mkdir/01.t': [('5-16', _SPECIAL, False)],
    'mkdir/03.t': [('1-2', _KEY_LENGTH, True)],
    'mkfifo/03.t': [('1-3', _KEY_LENGTH, True)],
    'mknod/03.t': [('1-3, 5-7, 9-11', _KEY_LENGTH, True)],
    'mkdir/10.t': [('7-10, 12-13, 15-16, 18-19, 21', _SPECIAL, False)],
    'open/01.t': [('6-21', _SPECIAL, False)],
    'open/03.t': [('1-3', _KEY_LENGTH, True)],
    'open/06.t': [('65-111', _SPECIAL, False)],
    'open/17.t': [('1-3', _SPECIAL, False)],
    'open/22.t': [('7-8, 10-11, 13-14, 16-17', _SPECIAL, False)],
    'open/24.t': [('1-5', _SPECIAL, False)],
    'rename/00.t': [
        ('8-10, 12, 14-15', _LINK, True),
        ('17-20, 22-27, 29-35, 37-42, 44-50, 52-57, 59-65, 67-72, 74-76, 102-117', _SPECIAL, False),
    ],
    'rename/02.t': [('2-3', _KEY_LENGTH, True)],
    'rename/09.t': [
        ('24-25, 32-33, 40-41, 48-49, 82-83, 86, 90-91, 94, 98-99, 102, 106-107, 110, 118, 140-141, '
         '148-149, 156-157, 164-165, 198-199, 206-207, 214-215, 222-223, 256-257, 264-265, 272-273, '
         '280-281, 308-309, 312-315, 318-321, 324-327, 330-331, 350-351, 354-357, 360-363, 366-369, '
         '372-373, 382-384, 386-387, 392, 394, 396, 398-399, 402, 404, 406-407, 410, 412, 414-415, 418, '
         '420, 422-423, 426, 428, 434, 436, 440-442, 444-445, 450, 452, 454, 456-457, 460, 462, 464-465, '
         '468, 470, 472-473, 476, 478, 480-481, 484, 486, 492, 494, 498-500, 502-503, 508, 510, 512, '
         '514-515, 518, 520, 522-523, 526, 528, 530-531, 534, 536, 538-539, 542, 544, 550, 552, 556-558, '
         '560-561, 566, 568, 570, 572-573, 576, 578, 580-581, 584, 586, 588-589, 592, 594, 596-597, 600, '
         '602, 608, 610, 614-616, 618-619, 624, 626, 628, 630-631, 634, 636, 638-639, 642, 644, 646-647, '
         '650, 652, 654-655, 658, 660, 666, 668, 672-675, 678-679, 682-705, 708-709, 712, 714-717, '
         '720-721, 724-747, 750-751, 754, 756-758, 760-761, 766, 768, 770, 772-773, 776, 778, 780-781, '
         '784, 786, 788-789, 792, 794, 796-797, 800, 802, 808, 810, 814-816, 818-819, 824, 826, 828, '
         '830-831, 834, 836, 838-839, 842, 844, 846-847, 850, 852, 854-855, 858, 860, 866, 868, 872-874, '
         '876-877, 882, 884, 886, 888-889, 892, 894, 896-897, 900, 902, 904-905, 908, 910, 912-913, 916, '
         '918, 924, 926, 930-932, 934-935, 940, 942, 944, 946-947, 950, 952, 954-955, 958, 960, 962-963, '
         '966, 968, 970-971, 974, 976, 982, 984, 988-990, 992-993, 998, 1000, 1002, 1004-1005, 1008, 1010, '
         '1012-1013, 1016, 1018, 1020-1021, 1024, 1026, 1028-1029, 1032, 1034, 1040, 1042, 1046-1049, '
         '1052-1053, 1056-1079, 1082-1083, 1086, 1088-1091, 1094-1095, 1098-1121, 1124-1125, 1128, '
         '1130-1132, 1134-1135, 1140, 1142, 1144, 1146-1147, 1150, 1152, 1154-1155, 1158, 1160, 1162-1163, '
         '1166, 1168, 1170-1171, 1174, 1176, 1182, 1184, 1188-1190, 1192-1193, 1198, 1200, 1202, '
         '1204-1205, 1208, 1210, 1212-1213, 1216, 1218, 1220-1221, 1224, 1226, 1228-1229, 1232, 1234, '
         '1240, 1242, 1246-1248, 1250-1251, 1256, 1258, 1260, 1262-1263, 1266, 1268, 1270-1271, 1274, '
         '1276, 1278-1279, 1282, 1284, 1286-1287, 1290, 1292, 1298, 1300, 1304-1306, 1308-1309, 1314, '
         '1316, 1318, 1320-1321, 1324, 1326, 1328-1329, 1332, 1334, 1336-1337, 1340, 1342, 1344-1345, '
         '1348, 1350, 1356, 1358, 1362-1364, 1366-1367, 1372, 1374, 1376, 1378-1379, 1382, 1384, '
         '1386-1387, 1390, 1392, 1394-1395, 1398, 1400, 1402-1403, 1406, 1408, 1414, 1416, 1420-1423, '
         '1426-1427, 1430-1453, 1456-1457, 1460, 1462-1465, 1468-1469, 1472-1495, 1498-1499, 1502, '
         '1504-1506, 1508-1509, 1514, 1516, 1518, 1520-1521, 1524, 1526, 1528-1529, 1532, 1534, 1536-1537, '
         '1540, 1542, 1544-1545, 1548, 1550, 1556, 1558, 1562-1564, 1566-1567, 1572, 1574, 1576, '
         '1578-1579, 1582, 1584, 1586-1587, 1590, 1592, 1594-1595, 1598, 1600, 1602-1603, 1606, 1608, '
         '1614, 1616, 1620-1622, 1624-1625, 1630, 1632, 1634, 1636-1637, 1640, 1642, 1644-1645, 1648, '
         '1650, 1652-1653, 1656, 1658, 1660-1661, 1664, 1666, 1672, 1674, 1678-1680, 1682-1683, 1688, '
         '1690, 1692, 1694-1695, 1698, 1700, 1702-1703, 1706, 1708, 1710-1711, 1714, 1716, 1718-1719, '
         '1722, 1724, 1730, 1732, 1736-1738, 1740-1741, 1746, 1748, 1750, 1752-1753, 1756, 1758, '
         '1760-1761, 1764, 1766, 1768-1769, 1772, 1774, 1776-1777, 1780, 1782, 1788, 1790, 1794-1797, '
         '1800-1801, 1804-1827, 1830-1831, 1834, 1836-1839, 1842-1843, 1846-1869, 1872-1873, 1876, '
         '1894-1895, 1902-1903, 1910-1911, 1918-1919, 1952-1953, 1960-1961, 1968-1969, 1976-1977, '
         '2010-2011, 2018-2019, 2026-2027, 2034-2035, 2058, 2064, 2066, 2068-2069, 2072, 2074, 2076-2077, '
         '2080, 2082, 2084-2085, 2088, 2090, 2092-2093, 2096, 2098, 2104, 2106, 2126-2127, 2134-2135, '
         '2142-2143, 2150-2151, 2178-2179, 2182-2185, 2188-2191, 2194-2197, 2200-2201, 2220-2221, '
         '2224-2227, 2230-2233, 2236-2239, 2242-2243',
         _SPECIAL, False),
    ],
    'rename/10.t': [
        ('17-18, 25-26, 33-34, 41-42, 69-70, 77-78, 85-86, 93-94, 121-122, 129-130, 137-138, 145-146, '
         '173-174, 181-182, 189-190, 197-198, 225-226, 233-234, 241-242, 249-250, 275-279, 281-298, '
         '301-302, 305, 315-319, 321-338, 341-342, 345, 347-348, 351, 353, 355, 357-358, 361, 363, '
         '365-366, 369, 371, 373-374, 377, 379, 381-382, 385, 387, 393, 395, 399-400, 403, 405, 407, '
         '409-410, 413, 415, 417-418, 421, 423, 425-426, 429, 431, 433-434, 437, 439, 445, 447, 451-452, '
         '455, 457, 459, 461-462, 465, 467, 469-470, 473, 475, 477-478, 481, 483, 485-486, 489, 491, 497, '
         '499, 503-504, 507, 509, 511, 513-514, 517, 519, 521-522, 525, 527, 529-530, 533, 535, 537-538, '
         '541, 543, 549, 551, 555-556, 559, 561, 563, 565-566, 569, 571, 573-574, 577, 579, 581-582, 585, '
         '587, 589-590, 593, 595, 601, 603, 607-608, 611, 615-617, 619-623, 625-629, 631-635, 637-638, '
         '641, 645, 647-648, 651, 655-657, 659-663, 665-669, 671-675, 677-678, 681, 685, 687-688, 691, '
         '693, 695, 697-698, 701, 703, 705-706, 709, 711, 713-714, 717, 719, 721-722, 725, 727, 733, 735, '
         '739-740, 743, 745, 747, 749-750, 753, 755, 757-758, 761, 763, 765-766, 769, 771, 773-774, 777, '
         '779, 785, 787, 791-792, 795, 797, 799, 801-802, 805, 807, 809-810, 813, 815, 817-818, 821, 823, '
         '825-826, 829, 831, 837, 839, 843-844, 847, 849, 851, 853-854, 857, 859, 861-862, 865, 867, '
         '869-870, 873, 875, 877-878, 881, 883, 889, 891, 895-896, 899, 901, 903, 905-906, 909, 911, '
         '913-914, 917, 919, 921-922, 925, 927, 929-930, 933, 935, 941, 943, 947-948, 951, 955-957, '
         '959-963, 965-969, 971-975, 977-978, 981, 985, 987-988, 991, 995-997, 999-1003, 1005-1009, '
         '1011-1015, 1017-1018, 1021, 1025, 1027-1028, 1031, 1033, 1035, 1037-1038, 1041, 1043, 1045-1046, '
         '1049, 1051, 1053-1054, 1057, 1059, 1061-1062, 1065, 1067, 1073, 1075, 1079-1080, 1083, 1085, '
         '1087, 1089-1090, 1093, 1095, 1097-1098, 1101, 1103, 1105-1106, 1109, 1111, 1113-1114, 1117, '
         '1119, 1125, 1127, 1131-1132, 1135, 1137, 1139, 1141-1142, 1145, 1147, 1149-1150, 1153, 1155, '
         '1157-1158, 1161, 1163, 1165-1166, 1169, 1171, 1177, 1179, 1183-1184, 1187, 1189, 1191, '
         '1193-1194, 1197, 1199, 1201-1202, 1205, 1207, 1209-1210, 1213, 1215, 1217-1218, 1221, 1223, '
         '1229, 1231, 1235-1236, 1239, 1241, 1243, 1245-1246, 1249, 1251, 1253-1254, 1257, 1259, '
         '1261-1262, 1265, 1267, 1269-1270, 1273, 1275, 1281, 1283, 1287-1288, 1291, 1295-1297, 1299-1303, '
         '1305-1309, 1311-1315, 1317-1318, 1321, 1325, 1327-1328, 1331, 1335-1337, 1339-1343, 1345-1349, '
         '1351-1355, 1357-1358, 1361, 1365, 1367-1368, 1371, 1373, 1375, 1377-1378, 1381, 1383, 1385-1386, '
         '1389, 1391, 1393-1394, 1397, 1399, 1401-1402, 1405, 1407, 1413, 1415, 1419-1420, 1423, 1425, '
         '1427, 1429-1430, 1433, 1435, 1437-1438, 1441, 1443, 1445-1446, 1449, 1451, 1453-1454, 1457, '
         '1459, 1465, 1467, 1471-1472, 1475, 1477, 1479, 1481-1482, 1485, 1487, 1489-1490, 1493, 1495, '
         '1497-1498, 1501, 1503, 1505-1506, 1509, 1511, 1517, 1519, 1523-1524, 1527, 1529, 1531, '
         '1533-1534, 1537, 1539, 1541-1542, 1545, 1547, 1549-1550, 1553, 1555, 1557-1558, 1561, 1563, '
         '1569, 1571, 1575-1576, 1579, 1581, 1583, 1585-1586, 1589, 1591, 1593-1594, 1597, 1599, '
         '1601-1602, 1605, 1607, 1609-1610, 1613, 1615, 1621, 1623, 1627-1628, 1631, 1635-1637, 1639-1643, '
         '1645-1649, 1651-1655, 1657-1658, 1661, 1665, 1667-1668, 1671, 1675-1677, 1679-1683, 1685-1689, '
         '1691-1695, 1697-1698, 1701, 1705, 1717-1718, 1725-1726, 1733-1734, 1741-1742, 1769-1770, '
         '1777-1778, 1785-1786, 1793-1794, 1821-1822, 1829-1830, 1837-1838, 1845-1846, 1873-1874, '
         '1881-1882, 1889-1890, 1897-1898, 1925-1926, 1933-1934, 1941-1942, 1949-1950, 1975-1979, '
         '1981-1998, 2001-2002, 2005, 2015-2019, 2021-2038, 2041-2042, 2045',
         _SPECIAL, False),
    ],
    'rename/12.t': [('8-31', _SPECIAL, False)],
    'rename/13.t': [('7-32', _SPECIAL, False)],
    'rename/14.t': [('7-8, 10-13, 15-18, 20-23, 25-26', _SPECIAL, False)],
    'rename/20.t': [('9-20, 22, 25', _SPECIAL, False)],
    'rename/23.t': [('4, 6-7, 9', _LINK, True), ('10-41', _SPECIAL, False)],
    'rmdir/01.t': [('12-14', _SPECIAL, False)],
    'rmdir/03.t': [('1-4', _KEY_LENGTH, True)],
    'rmdir/06.t': [('8-23', _SPECIAL, False)],
    'symlink/03.t': [('3-4', _KEY_LENGTH, True)],
    'symlink/08.t': [('7-8, 10-11, 13-14, 16-17', _SPECIAL, False)],
    'truncate/03.t': [('1-4', _KEY_LENGTH, True)],
    'unlink/00.t': [
        ('27-29, 108-110', _LINK, True),
        ('10-12, 14-16, 18-20, 22-24, 31-50, 55-70, 78-81, 84-87, 90-93, 96-99', _SPECIAL, False),
    ],
    'unlink/03.t': [('1-3', _KEY_LENGTH, True)],
    'unlink/11.t': [
        ('50-53, 56-59, 62-65, 68-71, 74-77, 80-85, 87-92, 94-97, 100-103, 106-109, 112-115, 118-121, '
         '124-129, 131-136, 138-141, 144-147, 150-153, 156-159, 162-165, 168-173, 175-180, 182-185, '
         '188-191, 194-197, 200-203, 206-209, 212-217, 219-224',
         _SPECIAL, False),
    ],
    'utimensat/00.t': [('12-31', _SPECIAL, False)],
}

# pytest runs a selection; .ci/run runs all of
# pjdfstest after the suite with OSSFUSE_POSIX_FULL=1 (about 5 minutes).
FULL = bool(os.environ.get("OSSFUSE_POSIX_FULL"))
_ALL_DIRS = ["chflags", "chmod", "chown", "ftruncate", "granular", "link", "mkdir", "mkfifo", "mknod", "open",
             "posix_fallocate", "rename", "rmdir", "symlink", "truncate", "unlink", "utimensat"]
PJDFSTEST_GROUPS = ({d: [d] for d in _ALL_DIRS} if FULL else {
    # the directories of the fixes of issue 13 (ctime, atime, st_nlink, unlink and rename while
    # uploads run): about 2.5 minutes on a busy 2-core machine. rename/09.t and 10.t (4,450
    # sticky-bit subtests, half of the whole run) run only in the full run.
    "chmod": ["chmod"], "open": ["open"], "rmdir": ["rmdir"], "unlink": ["unlink"], "utimensat": ["utimensat"],
    "rename": [f"rename/{n:02d}.t" for n in range(0, 25) if n not in (9, 10)],
})


def expected_for(test_file: str) -> tuple[set[int], set[int]]:
    """(all expected failures, the strict ones) of pjdfstest file ``dir/NN.t``."""
    allowed: set[int] = set()
    strict: set[int] = set()
    for subtests, _reason, is_strict in EXPECTED_FAILURES.get(test_file, []):
        nums = parse_ranges(subtests)
        allowed |= nums
        if is_strict:
            strict |= nums
    return allowed, strict


def check_pjdfstest(output: str, tests_root: str, dirs: list[str]) -> list[str]:
    """The problems of one prove run over ``dirs``: unexpected failures and stale entries of
    EXPECTED_FAILURES, one line per test file."""
    results = parse_prove_summary(output, tests_root)
    problems = []
    for test_file, res in sorted(results.items()):
        allowed, _ = expected_for(test_file)
        unexpected = sorted(res.failed - allowed)
        if unexpected or (res.note and not res.failed <= allowed):
            problems.append(f"{test_file}: subtests {_fmt(unexpected)} failed{res.note}")
    for test_file in sorted(EXPECTED_FAILURES):
        if not any(test_file == d or test_file.startswith(d + "/") for d in dirs):
            continue
        _, strict = expected_for(test_file)
        res = results.get(test_file)
        passing = sorted(strict - (res.failed if res else set()))
        if passing:
            problems.append(f"{test_file}: subtests {_fmt(passing)} listed as expected failures now pass: "
                            "take them off EXPECTED_FAILURES")
    return problems


def _fmt(nums: list[int]) -> str:
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


def run_prove(tools: Tools, cwd: str, dirs: list[str], jobs: int = 2, timeout: float = 1700 if FULL else 850) -> str:
    """prove over pjdfstest's ``dirs`` from ``cwd`` (inside the mount); returns its output."""
    r = subprocess.run(["prove", "-r", f"-j{jobs}", *[os.path.join(tools.pjdfstest_tests, d) for d in dirs]],
                       cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return r.stdout + r.stderr


@pytest.mark.timeout(1800 if FULL else 900)
@pytest.mark.parametrize("store_kind", ["local"])
@pytest.mark.parametrize("group", sorted(PJDFSTEST_GROUPS))
def test_pjdfstest(tools, make_mount, group):
    m = make_mount(mount_options="allow_other = true")
    work = m.path("pjdfstest")
    os.mkdir(work)
    os.chmod(work, 0o755)
    dirs = PJDFSTEST_GROUPS[group]
    output = run_prove(tools, work, dirs)
    assert "Result:" in output, output[-3000:]
    problems = check_pjdfstest(output, tools.pjdfstest_tests, dirs)
    assert not problems, "pjdfstest:\n" + "\n".join(problems)


# -- fsx ------------------------------------------------------------------------------------

# .ci/run runs the 100,000 of issue 13 plain and 25,000 with close/open (100,000 plain on the
# local store took 342 s on 2 cores; close/open is the slowest: each reopen's first write
# re-encrypts the file, and 4 runs of 100,000 would not fit CI's 90 minutes with the suite);
# the suite 3,000 (5,000 took 70-180 s per run on a 2-core machine at load 10)
FSX_OPS_BY_MODE = {"plain": 100_000, "closeopen": 25_000} if FULL else {"plain": 3_000, "closeopen": 3_000}
FSX_TIMEOUT = 3600 if FULL else 400  # seconds for the run on a mount
FSX_MAX_LEN = 4 * 1024 * 1024
# Operations neither the mount nor tmpfs offers alike are turned off on both, so the two runs
# draw the same operations: fallocate (-F), KEEP_SIZE (-K), unshare (-u), punch hole (-H), zero
# range (-z), collapse (-C), insert (-I), clone (-J), dedupe (-B), atomic (-a).
FSX_COMMON = ["-l", str(FSX_MAX_LEN), "-S", "1", "-q",
              "-F", "-K", "-u", "-H", "-z", "-C", "-I", "-J", "-B", "-a"]
FSX_MODES = {"plain": [], "closeopen": ["-c", "50"]}


def run_fsx(tools: Tools, path: str, args: list[str], logdir: str, timeout: float, ops: int) -> None:
    r = subprocess.run([tools.fsx, "-N", str(ops), *FSX_COMMON, *args, "-P", logdir, path], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0 and f"All {ops} operations completed A-OK!" in r.stdout, \
        f"fsx {args} on {path}: exit {r.returncode}\n{(r.stdout + r.stderr)[-4000:]}"


@pytest.mark.timeout(FSX_TIMEOUT + 300)
@pytest.mark.parametrize("mode", sorted(FSX_MODES))
def test_fsx(tools, make_mount, tmp_path, mode):
    m = make_mount()
    args = FSX_MODES[mode]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as ref_dir:
        ref = os.path.join(ref_dir, "fsx.bin")
        ops = FSX_OPS_BY_MODE[mode]
        run_fsx(tools, ref, args, str(tmp_path), timeout=600, ops=ops)
        run_fsx(tools, m.path("fsx.bin"), args, str(tmp_path), timeout=FSX_TIMEOUT, ops=ops)
        m.remount()  # cold: the cache emptied, the file read from the bucket
        assert os.path.getsize(m.path("fsx.bin")) == os.path.getsize(ref)
        assert filecmp.cmp(m.path("fsx.bin"), ref, shallow=False)


# -- attribute rules pjdfstest measures, each shown on its own (and across a cold remount) ----

def test_unlinked_open_file_has_no_links(mount):
    p = mount.path("f")
    with open(p, "wb") as f:
        f.write(b"x")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.fstat(fd).st_nlink == 1
        os.unlink(p)
        assert os.fstat(fd).st_nlink == 0
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)


def test_directory_links_count_subdirectories(mount):
    d = mount.path("d")
    os.mkdir(d)
    assert os.stat(d).st_nlink == 2
    os.mkdir(os.path.join(d, "a"))
    os.mkdir(os.path.join(d, "b"))
    with open(os.path.join(d, "file"), "wb"):
        pass
    assert os.stat(d).st_nlink == 4
    os.mkdir(mount.path("e"))
    os.rename(os.path.join(d, "a"), mount.path("e", "a"))
    assert (os.stat(d).st_nlink, os.stat(mount.path("e")).st_nlink) == (3, 3)
    os.rmdir(os.path.join(d, "b"))
    assert os.stat(d).st_nlink == 2
    mount.remount()
    os.listdir(mount.path("e"))  # counted from its listing after a remount
    assert os.stat(mount.path("e")).st_nlink == 3


def test_atime_is_stored_and_reads_leave_it(mount):
    p = mount.path("f")
    with open(p, "wb") as f:
        f.write(b"data")
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    with open(p, "rb") as f:
        assert f.read() == b"data"
    assert os.stat(p).st_atime_ns == 1_000_000_000  # noatime: a read does not change it
    mount.remount()
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    subprocess.run(["touch", "-a", "-d", "@5", p], check=True)
    mount.remount()
    assert os.stat(p).st_atime_ns == 5_000_000_000


def test_ctime_follows_changes_and_survives_remount(mount):
    p = mount.path("f")
    with open(p, "wb") as f:
        f.write(b"data")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))  # ctime becomes now, mtime goes back
    c0 = os.stat(p).st_ctime_ns
    assert c0 > 1_000_000_000
    os.chown(p, -1, -1)  # changes nothing: ctime stays (POSIX: "need not be updated")
    assert os.stat(p).st_ctime_ns == c0
    os.chmod(p, 0o600)
    c1 = os.stat(p).st_ctime_ns
    assert c1 > c0
    mount.remount()
    st = os.stat(p)
    assert (st.st_ctime_ns, st.st_mtime_ns, stat.S_IMODE(st.st_mode)) == (c1, 1_000_000_000, 0o600)
    os.rename(p, mount.path("g"))
    assert os.stat(mount.path("g")).st_ctime_ns > c1


def test_rmdir_right_after_unlinking_a_just_closed_file(mount):
    """unlink returns only once an upload of the file that was in flight has ended and deleted
    what it put: rmdir of its directory right after must not find it (ENOTEMPTY; pjdfstest
    rmdir/01.t under load, about one try in three before the fix)."""
    for i in range(30):
        d = mount.path(f"d{i}")
        os.mkdir(d)
        # made read-only (pjdfstest's create): its close journals nothing, the upload starts
        # in the background and is still in flight at the unlink
        os.close(os.open(os.path.join(d, "f"), os.O_CREAT | os.O_RDONLY, 0o644))
        os.unlink(os.path.join(d, "f"))
        os.rmdir(d)
    assert os.listdir(mount.mnt) == []
    assert mount.keys() == []


def test_rename_over_a_file_whose_upload_is_in_flight_keeps_the_renamed_content(mount):
    """A rename over a file still uploading waits for that upload: it used to land over the
    rename's copy (the destination's old bytes under the renamed file's name, and the next
    rename or chmod refused with ESTALE as if another client had written; pjdfstest rename/09.t)."""
    os.mkdir(mount.path("a"))
    os.mkdir(mount.path("b"))
    for i in range(15):
        src, dst = mount.path("a", "x"), mount.path("b", "y")
        with open(src, "wb") as f:
            f.write(b"source %d" % i)
        # made read-only (pjdfstest's create): its upload runs in the background after close
        os.close(os.open(dst, os.O_CREAT | os.O_RDONLY, 0o644))
        os.rename(src, dst)
        os.rename(dst, src)
        with open(src, "rb") as f:
            assert f.read() == b"source %d" % i
    mount.remount()
    with open(mount.path("a", "x"), "rb") as f:
        assert f.read() == b"source 14"
    assert sorted(mount.keys()) == ["a/", "a/x", "b/"]


def test_inode_numbers_stay_when_the_kernel_forgets_a_node(tmp_path, cmk_path):
    """The kernel forgets an inode whenever it evicts it (a symlink just made, often, while other
    renames run: issue 13's inode-rename.sh). The node made again for that name gets its number
    back; a name unlinked or renamed away and made anew is a new inode."""
    import trio

    from ossfuse.config import CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig, StoreConfig
    from ossfuse.fs import Filesystem
    from ossfuse.keyring import Keyring
    from ossfuse.store.local import LocalStore

    cfg = Config(path=str(tmp_path / "ossfuse.toml"), store=StoreConfig(url=f"local://{tmp_path / 'bucket'}"),
                 encryption=EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),)),
                 cache=CacheConfig(dir=str(tmp_path / "cache")), mount=MountConfig(upload_delay=0.0))
    os.makedirs(tmp_path / "bucket")

    async def main():
        fs = Filesystem(cfg, LocalStore(str(tmp_path / "bucket")), Keyring(cfg.encryption), uid=1, gid=2)
        root = fs.get(1)
        link = await fs.symlink(root, "l", "target", 1, 2)  # lookup count one
        ino = link.ino
        fs.forget(ino, 1)
        assert ino not in fs.inodes.nodes  # dropped
        again = await fs.lookup(root, "l")
        assert again is not link and again.ino == ino
        await fs.rename(root, "l", root, "m", 0)
        fs.forget(ino, 1)
        assert (await fs.lookup(root, "m")).ino == ino  # renamed, dropped, found again
        await fs.unlink(root, "m")
        fs.forget(ino, 1)
        new = await fs.symlink(root, "m", "other", 1, 2)
        assert new.ino != ino  # a new file at that name
        fs.forget(new.ino, 1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        fs.forget(d.ino, 1)
        assert (await fs.lookup(root, "d")).ino == d.ino
        await fs.store.aclose()
        fs.close()

    trio.run(main)


def test_rename_of_a_file_whose_new_version_is_uploading_moves_that_version(mount):
    """A rename of a committed file while its next version uploads (over 1 MiB: close leaves
    it to the background upload) waits for that upload: a copy naming the old version was
    refused with an ERROR line saying another client had changed the file (pjdfstest
    rename/09.t, 10.t; the log checker fails the test on it)."""
    data = os.urandom(2 << 20)
    for i in range(6):
        p, q = mount.path("x"), mount.path("y")
        with open(p, "wb") as f:
            f.write(b"v1")
        with open(p, "r+b") as f:
            f.write(data[:-1] + bytes([i]))
        os.rename(p, q)
        os.rename(q, p)
        with open(p, "rb") as f:
            assert f.read() == data[:-1] + bytes([i])
    mount.remount()
    with open(mount.path("x"), "rb") as f:
        assert f.read() == data[:-1] + bytes([5])
