package main

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

// Test helper modes: the test binary re-executes itself inside a network
// namespace (nsenter) to play a peer there. Selected by RELAY_TEST_HELPER.
func runHelper(mode string, args []string) {
	switch mode {
	case "quic-echo", "quic-get", "h3-get": // QUIC peers (quic_test.go)
		runQUICHelper(mode, args)
	case "proxy-echo": // upstream: reply with the PROXY v1 line received
		ln, err := net.Listen("tcp", args[0])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(1)
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				io.WriteString(c, line)
			}()
		}
	case "banner": // a plain listener that greets with args[1]
		ln, err := net.Listen("tcp", args[0])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("listening")
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(1)
			}
			io.WriteString(c, args[1]+"\n")
			c.Close()
		}
	case "hello-client": // send a real ClientHello for args[1] to args[0], print the first reply line
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			fmt.Println("dial error:", err)
			os.Exit(1)
		}
		a, b := net.Pipe()
		go tls.Client(a, &tls.Config{ServerName: args[1], InsecureSkipVerify: true}).Handshake()
		b.SetReadDeadline(time.Now().Add(5 * time.Second))
		hdr := make([]byte, 5)
		io.ReadFull(b, hdr)
		body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
		io.ReadFull(b, body)
		c.Write(append(hdr, body...))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Print(line)
	}
	os.Exit(0)
}
